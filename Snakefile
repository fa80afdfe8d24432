# The STC paper as a workflow: models and benchmarks -> one papermill evaluation per (benchmark, method,
# shard) -> merged scores -> latency and analysis runs -> tables and figures.
#
#   snakemake all --cores 2 --configfile config/tiny.yaml    # offline, CPU, minutes ("tiny profile - not paper numbers")
#   snakemake all --cores 8 --resources gpu=1                 # the paper profile on one local GPU
#   snakemake all --cores 64 --resources gpu=8                # on 8 local GPUs, a GPU per job (stc.gpus), 8 threads each
#   snakemake all --profile profiles/slurm                    # the paper profile on a SLURM cluster
#   snakemake all --cores 1 --config compute=false            # tables and figures from committed results/
#
# config/<profile>.yaml is the base (profile from --config/--configfile, default "paper"); what is given on
# the command line is merged over it and validated against config/schema.yaml (stc.workflow.load_config).
# Every path comes from stc.workflow.Layout, relative to the project root (config "root", STC_ROOT or here).
# Compute rules declare the stc sources they run, so a change to a method re-runs what depends on it;
# the plotting rules (tables, figures) only read results, so restyling never re-runs a model.

import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from stc import workflow as wf
from stc.methods import METHODS

try:
    _resolved = wf.load_config(config)
except wf.ConfigError as error:
    raise WorkflowError(str(error)) from None
config.clear()
config.update(_resolved)

ROOT = wf.project_root(config)
PROFILE = config["profile"]
LABEL = wf.label(config)
COMPUTE = config["compute"]
layout = wf.Layout.of(config)
NOTEBOOKS = Path(workflow.basedir) / "notebooks"
SOURCES = sorted(str(p) for p in (Path(workflow.basedir) / "stc").rglob("*.py"))
PLOTTING = {"tables.py", "figures.py", "paper_numbers.py", "speed.py"}
LAUNCHING = {"gpus.py"}  # picks a job's GPU; changes no result
ENGINE_SOURCES = [s for s in SOURCES if Path(s).name not in PLOTTING | LAUNCHING | {"analysis.py"}]
ANALYSIS_SOURCES = [s for s in SOURCES if Path(s).name not in PLOTTING | LAUNCHING]
PLOT_SOURCES = [s for s in SOURCES if Path(s).name in PLOTTING or Path(s).name == "workflow.py"]

# The paper profile stops here, before any job, if this machine cannot run it. Dry runs (-n) only plan;
# jobs submitted to a cluster are checked where they run (the submit host needs no GPU).
DRY_RUN = getattr(workflow.output_settings, "dryrun", False)
if COMPUTE and workflow.local_exec and not (DRY_RUN or workflow.remote_exec or workflow.subprocess_exec):
    try:
        wf.check_environment(config, ROOT)
    except wf.EnvironmentNotReady as error:
        raise WorkflowError(str(error)) from None

workdir: str(ROOT)

EVALUATIONS = {(e.benchmark, e.method): e for e in wf.evaluations(config)} if COMPUTE else {}
GPU_JOB, CPU_JOB = config["resources"]["gpu_job"], config["resources"]["cpu_job"]
# Jobs run with the project root as STC_ROOT, so notebooks and `python -m stc...` resolve paths like the
# Snakefile, and with the Python that runs Snakemake (the project's environment, activated or not).
ENV = f"STC_ROOT={ROOT} OMP_NUM_THREADS={{threads}}"
PYTHON = sys.executable
# GPU jobs start through stc.gpus, which gives each its own GPU(s) on a machine with several (--resources
# gpu=N only limits how many run at once); with one GPU, or a cluster job's own, the command runs as it is.
# The latency job runs alone (--exclusive): other jobs on the machine's other GPUs would perturb its timing.
ON_GPUS, ALONE_ON_GPUS = (f"{PYTHON} -m stc.gpus --count {GPU_JOB['gpu']}{flag} -- " if GPU_JOB["gpu"] else ""
                          for flag in ("", " --exclusive"))

wildcard_constraints:
    benchmark="|".join(wf.BENCHMARKS),
    method="|".join(re.escape(m) for m in METHODS),
    shard=r"\d+",
    shards=r"\d+",


def absolute(path):
    return str(ROOT / path)


def model_ready():
    return layout.model_marker(config)


def benchmark_ready(benchmark):
    """The file whose presence says a benchmark's annotation and videos are in place."""
    if config["benchmarks"]["source"] == "synthetic":
        return layout.annotation(config, benchmark)
    return f"data/benchmarks/{benchmark}/.download-done"


def video_ready(spec):
    return [benchmark_ready(spec.removeprefix("benchmark:"))] if spec.startswith("benchmark:") else []


def score_files():
    if COMPUTE:
        return [layout.scores.format(benchmark=b, method=m) for b, m in EVALUATIONS]
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / layout.results_dir / "scores").glob("*/*.json"))


# The committed GPU measurements behind the speed report (issue 7); they are data in the repository.
SPEED_GLOB = str(Path(workflow.basedir) / "results" / "latency" / "*.json")
SPEED_FILES = sorted(str(p) for p in Path(workflow.basedir).glob("results/latency/*.json"))


def latency_files():
    """The one latency file behind the tables and figures (no mixing of protocols)."""
    if COMPUTE:
        return [layout.latency(config)]
    committed = config["latency"]["committed"]
    return [committed] if committed and (ROOT / committed).exists() else []


def model_parameters():
    model = config["model"]
    return {"profile": PROFILE, "label": LABEL,
            "model": absolute(layout.tiny_model) if model["name"] == "tiny" else model["name"],
            "model_cache_dir": absolute(layout.hf_cache), "dtype": model["dtype"], "device": model["device"]}


# Inputs are fetched where snakemake runs (cluster nodes often have no network); `all` only collects.
localrules:
    all,


rule all:
    input:
        [layout.table(key, ext) for key in config["tables"] for ext in ("md", "csv")],
        layout.tables_markdown,
        layout.table("speed", "md"),
        [layout.figure(name) for name in wf.FIGURES],


# ------------------------------------------------------------------------------------------------ inputs

if config["model"]["name"] == "tiny":

    rule tiny_model:
        output:
            model_ready(),
        log:
            layout.log("model"),
        threads: 1
        shell:
            f"{ENV} {PYTHON} -m stc.models save-tiny {layout.tiny_model} &> {{log}}"

else:

    rule download_model:
        output:
            model_ready(),
        log:
            layout.log("model"),
        params:
            name=config["model"]["name"],
            cache=layout.hf_cache,
        threads: 1
        shell:
            f"{ENV} {PYTHON} -m stc.models download {{params.name}} --cache-dir {{params.cache}} > {{output}}.tmp 2> {{log}}"
            " && mv {output}.tmp {output}"

    localrules:
        download_model,


if config["benchmarks"]["source"] == "synthetic":

    rule synthetic_suite:
        output:
            [layout.annotation(config, b) for b in wf.BENCHMARKS],
        log:
            layout.log("synthetic_suite"),
        params:
            folder=str(Path(layout.annotation(config, "ovobench")).parents[1]),
            synthetic=config["benchmarks"]["synthetic"],
        threads: 1
        shell:
            f"{ENV} {PYTHON} -m stc.benchmarks.synthetic {{params.folder}} --seed {{params.synthetic[seed]}}"
            " --n-videos {params.synthetic[n_videos]} --duration {params.synthetic[duration_s]} &> {log}"

else:

    rule download_benchmark:
        output:
            touch("data/benchmarks/{benchmark}/.download-done"),
        log:
            layout.log("download_{benchmark}"),
        threads: 1
        shell:
            f"{ENV} {PYTHON} -m stc.benchmarks.download {{wildcards.benchmark}} --root {ROOT} &> {{log}}"

    localrules:
        download_benchmark,


# ------------------------------------------------------------------------------------------------ compute

rule evaluate:
    """One (benchmark, method, shard) evaluation: notebooks/run_benchmark.ipynb under papermill."""
    input:
        notebook=NOTEBOOKS / "run_benchmark.ipynb",
        model=model_ready(),
        benchmark=lambda w: benchmark_ready(w.benchmark),
        sources=ENGINE_SOURCES,
    output:
        answers=layout.run_stem + ".jsonl",
        status=layout.run_stem + ".status.json",
        notebook=layout.run_stem + ".ipynb",
    log:
        layout.run_log,
    threads: GPU_JOB["threads"]
    resources:
        gpu=GPU_JOB["gpu"],
        mem_mb=GPU_JOB["mem_mb"],
        runtime=GPU_JOB["runtime"],
    params:
        papermill=lambda w, output, threads: wf.papermill_parameters({
            **model_parameters(),
            "attn_implementation": config["model"]["attn_implementation"],
            "benchmark": wf.loader_name(config, w.benchmark),
            "annotation_path": absolute(layout.annotation(config, w.benchmark)),
            "video_root": absolute(layout.videos(config, w.benchmark)),
            "synthetic_dir": absolute(str(Path(layout.annotation(config, "ovobench")).parents[1])),
            "method": w.method,
            "shard_index": int(w.shard),
            "shard_count": int(w.shards),
            "limit": config["benchmarks"]["limit"],
            "sample_fps": config["benchmarks"]["sample_fps"],
            "streaming": config["benchmarks"]["streaming"],
            **config["engine"],
            "out_path": absolute(output.answers),
            "status_path": absolute(output.status),
            "threads": threads,
            "progress": False,
        }),
    shell:
        f"{ENV} {ON_GPUS}{PYTHON} -m papermill {{input.notebook}} {{output.notebook}} -k python3 {{params.papermill}} &> {{log}}"


if COMPUTE:

    rule merge_scores:
        """Every evaluation's shards: answers concatenated in shard order, then scored (stc.workflow.merge_shards).
        One job for all, since a job's start-up (importing torch) costs more than merging."""
        input:
            answers=[f for e in EVALUATIONS.values() for f in wf.shard_files(layout, e, ".jsonl")],
            statuses=[f for e in EVALUATIONS.values() for f in wf.shard_files(layout, e, ".status.json")],
            sources=[s for s in SOURCES if "/benchmarks/" in s or s.endswith("workflow.py")],
        output:
            answers=[layout.answers.format(benchmark=b, method=m) for b, m in EVALUATIONS],
            scores=[layout.scores.format(benchmark=b, method=m) for b, m in EVALUATIONS],
        run:
            for index, e in enumerate(EVALUATIONS.values()):
                wf.merge_shards(e.benchmark, e.method, wf.shard_files(layout, e, ".jsonl"),
                                wf.shard_files(layout, e, ".status.json"), output.answers[index], output.scores[index],
                                loader=wf.loader_name(config, e.benchmark), profile=PROFILE, label_text=LABEL)

    rule latency:
        """Per-stage latency and memory of the configured methods: notebooks/latency.ipynb."""
        input:
            notebook=NOTEBOOKS / "latency.ipynb",
            model=model_ready(),
            sources=ENGINE_SOURCES,
        output:
            latency=layout.latency(config),
            notebook=layout.notebook_out("latency"),
        log:
            layout.log("latency"),
        threads: GPU_JOB["threads"]
        resources:
            gpu=GPU_JOB["gpu"],
            mem_mb=GPU_JOB["mem_mb"],
            runtime=GPU_JOB["runtime"],
        params:
            papermill=lambda w, output, threads: wf.papermill_parameters({
                **model_parameters(),
                "attn_implementation": config["model"]["attn_implementation"],
                **{k: v for k, v in config["latency"].items() if k not in ("name", "committed")},
                "retrieve_top_k": config["engine"]["retrieve_top_k"],
                "n_local": config["engine"]["n_local"],
                "out_path": absolute(output.latency),
                "committed_glob": "results/latency/*.json",
                "threads": threads,
            }),
        shell:
            f"{ENV} {ALONE_ON_GPUS}{PYTHON} -m papermill {{input.notebook}} {{output.notebook}} -k python3 {{params.papermill}} &> {{log}}"

    rule analysis:
        """Fig. 2's frame similarity by ViT layer and the token maps of a real video (stc.analysis)."""
        input:
            model=model_ready(),
            videos=video_ready(config["analysis"]["similarity_video"]) + video_ready(config["analysis"]["token_video"]),
            sources=ANALYSIS_SOURCES,
        output:
            similarity=layout.similarity,
            token_maps=layout.token_maps,
        log:
            layout.log("analysis"),
        threads: GPU_JOB["threads"]
        resources:
            gpu=GPU_JOB["gpu"],
            mem_mb=GPU_JOB["mem_mb"],
            runtime=GPU_JOB["runtime"],
        params:
            model=model_parameters(),
            a=config["analysis"],
        shell:
            f"{ENV} {ON_GPUS}{PYTHON} -m stc.analysis --model {{params.model[model]}} --root {ROOT}"
            " --cache-dir {params.model[model_cache_dir]} --dtype {params.model[dtype]} --device {params.model[device]}"
            " --similarity-out {output.similarity} --similarity-video {params.a[similarity_video]}"
            " --uniform-frames {params.a[uniform_frames]} --sample-fps {params.a[sample_fps]}"
            " --token-maps-out {output.token_maps} --token-video {params.a[token_video]}"
            " --token-sample-fps {params.a[token_sample_fps]} --token-frames {params.a[token_frames]}"
            " --method {params.a[token_method]} &> {log}"


# ------------------------------------------------------------------------------------------------ plots

rule tables:
    """Every paper table with our numbers and the difference: notebooks/tables.ipynb (reads results only)."""
    input:
        notebook=NOTEBOOKS / "tables.ipynb",
        scores=score_files(),
        latency=latency_files(),
        speed=SPEED_FILES,
        sources=PLOT_SOURCES,
    output:
        [layout.table(key, ext) for key in config["tables"] for ext in ("md", "csv")],
        markdown=layout.tables_markdown,
        speed=layout.table("speed", "md"),
        notebook=layout.notebook_out("tables"),
    log:
        layout.log("tables"),
    threads: 1
    resources:
        mem_mb=CPU_JOB["mem_mb"],
        runtime=CPU_JOB["runtime"],
    params:
        papermill=lambda w, input, output: wf.papermill_parameters({
            "profile": PROFILE,
            "label": LABEL,
            "scores_dir": absolute(f"{layout.results_dir}/scores"),
            "latency_paths": [absolute(p) for p in input.latency],
            "table_keys": config["tables"],
            "speed_glob": SPEED_GLOB,
            "out_dir": absolute(str(Path(output.markdown).parent)),
        }),
    shell:
        f"{ENV} {PYTHON} -m papermill {{input.notebook}} {{output.notebook}} -k python3 {{params.papermill}} &> {{log}}"


rule figures:
    """Figs. 1-2, the ablations, the latency sweep and the token maps: notebooks/figures.ipynb (reads results only)."""
    input:
        notebook=NOTEBOOKS / "figures.ipynb",
        scores=score_files(),
        latency=latency_files(),
        analysis=[layout.similarity, layout.token_maps] if COMPUTE else [],
        speed=SPEED_FILES,
        sources=PLOT_SOURCES,
    output:
        [layout.figure(name) for name in wf.FIGURES],
        notebook=layout.notebook_out("figures"),
    log:
        layout.log("figures"),
    threads: 1
    resources:
        mem_mb=CPU_JOB["mem_mb"],
        runtime=CPU_JOB["runtime"],
    params:
        papermill=lambda w, input: wf.papermill_parameters({
            "profile": PROFILE,
            "label": LABEL,
            "scores_dir": absolute(f"{layout.results_dir}/scores"),
            "latency_path": absolute(input.latency[0]) if input.latency else "",
            "similarity_path": absolute(layout.similarity),
            "token_maps_path": absolute(layout.token_maps),
            "compute_missing": False,
            "speed_glob": SPEED_GLOB,
            "out_dir": absolute(config["figures_dir"]),
        }),
    shell:
        f"{ENV} {PYTHON} -m papermill {{input.notebook}} {{output.notebook}} -k python3 {{params.papermill}} &> {{log}}"
