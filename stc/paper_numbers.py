"""Every number the STC paper (arXiv 2512.00891 v2, CVPR 2026) reports in Tables 1-10 and Figs. 1-2.

Transcribed by hand from the paper; `tests/test_tables.py` spot-checks them and checks the printed
averages against their parts. Accuracies are percentages; "ViT" and "Prefill" are the paper's
latency columns (ViT encoding of 16 frames and LLM prefilling; printed as seconds, the magnitudes
fit milliseconds). A value the paper does not print is None.

`PAPER_TABLES[key]` is a `PaperTable`; its rows are `PaperRow(base, setting, values)` where `base`
is the base model (Dispider, LiveCC, StreamForest, ReKV) and `setting` the paper's row label
("" for the base model itself). `PRINTED_CHANGES` holds the relative latency changes printed in
parentheses. `FIG1_TIME_SHARES` and `FIG2_ADJACENT_SIMILARITY` hold the two figures' numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class PaperRow:
    """One printed row: base model, the paper's row label ("" = the base model) and its values."""

    base: str
    setting: str
    values: tuple[float | None, ...]

    @property
    def label(self) -> str:
        """Base model and setting, e.g. "ReKV +STC-Pruner" (unique within a table)."""
        return f"{self.base} {self.setting}".strip()


@dataclass(frozen=True)
class PaperTable:
    """A table of the paper: its columns, its rows and what it measures."""

    key: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[PaperRow, ...]
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        for row in self.rows:
            if len(row.values) != len(self.columns):
                raise ValueError(f"{self.key}: row {row.label!r} has {len(row.values)} values for {len(self.columns)} columns")
        labels = [row.label for row in self.rows]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{self.key}: row labels are not unique: {labels}")

    def row(self, label: str) -> PaperRow:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(f"{self.key} has no row {label!r}; rows: {[r.label for r in self.rows]}")

    def value(self, label: str, column: str) -> float | None:
        """The printed value at (row label, column)."""
        if column not in self.columns:
            raise KeyError(f"{self.key} has no column {column!r}; columns: {list(self.columns)}")
        return self.row(label).values[self.columns.index(column)]


def _rows(base: str, spec: str) -> list[PaperRow]:
    """Parse a compact block: one row per line, "setting | v1 v2 ...", "-" as the setting of the base row."""
    rows = []
    for line in spec.strip().splitlines():
        setting, values = (part.strip() for part in line.split("|"))
        rows.append(PaperRow(base, "" if setting == "-" else setting, tuple(float(v) for v in values.split())))
    return rows


OVO_COLUMNS = (
    "OCR", "ACR", "ATR", "STU", "FPD", "OJR", "RT-Avg",
    "EPM", "ASI", "HLD", "BT-Avg",
    "REC", "SSR", "CRR", "FAR-Avg",
    "Overall", "ViT", "Prefill",
)  # fmt: skip

TABLE1 = PaperTable(
    key="table1",
    title="Table 1: OVO-Bench (accuracy %, latency)",
    columns=OVO_COLUMNS,
    rows=tuple(
        _rows("Dispider", """
            -            | 49.7 44.0 60.3 43.8 59.4 48.4 51.0 47.8 54.7 5.4 36.0 16.9 40.1 45.8 34.3 40.4 26.4 115.9
            +STC-Cacher  | 50.7 39.4 55.9 41.7 58.4 48.5 49.1 47.5 53.7 5.4 35.2 17.2 36.6 45.3 33.4 39.2 18.9 115.9
        """)
        + _rows("LiveCC", """
            -            | 68.5 39.4 62.1 43.8 68.3 59.8 57.0 58.2 59.5 89.2 69.0 30.9 56.4 72.1 53.2 59.7 181.2 818.4
            +STC-Cacher  | 61.7 36.7 59.5 43.8 67.3 53.8 53.8 56.6 56.1 87.6 66.8 29.8 54.2 70.0 51.3 57.3 126.84 818.4
        """)
        + _rows("StreamForest", """
            -            | 71.8 51.4 72.4 46.6 67.3 59.8 61.6 59.3 63.5 33.3 52.0 32.5 70.8 56.7 53.3 54.3 103.7 366.2
            +STC-Cacher  | 66.4 49.5 65.5 46.1 66.3 60.9 59.1 57.9 62.2 32.8 51.5 29.9 68.2 56.3 51.5 52.3 67.7 366.2
        """)
        + _rows("ReKV", """
            -                    | 73.8 56.0 74.1 51.7 70.3 60.3 64.4 54.2 57.4 28.5 46.7 25.4 64.6 53.3 47.8 52.6 103.7 482.4
            +ToMe                | 61.1 49.5 52.6 42.7 62.4 50.0 53.1 49.2 50.0 29.6 42.9 19.2 60.7 50.0 43.3 46.4 70.5 257.8
            +VisionZip           | 49.0 49.5 64.7 44.4 64.4 50.5 53.8 47.1 54.1 30.7 44.0 21.9 58.4 53.8 44.7 47.5 103.7 258.3
            +VidCom2             | 65.8 59.6 69.0 47.2 64.4 56.5 60.4 50.5 53.4 32.8 45.6 25.8 59.0 50.8 45.2 50.4 103.7 259.1
            +STC-Pruner          | 64.4 59.6 68.1 48.9 65.4 56.5 60.5 51.2 52.0 33.3 45.5 25.9 59.3 52.1 45.8 50.6 103.7 259.2
            +STC-Cacher & Pruner | 68.5 57.8 73.3 47.2 68.3 59.8 62.5 50.5 55.4 30.1 45.3 27.9 63.3 52.9 48.0 52.0 78.3 263.7
        """)
    ),
    notes=(
        "Overall is the mean of the three category averages; the printed Overall of ReKV (52.6), "
        "StreamForest (54.3) and StreamForest +STC-Cacher (52.3) do not match that mean (53.0, 55.6, 54.0 would).",
        "Printed category averages off the mean of their tasks by more than rounding: Dispider +STC-Cacher "
        "BT-Avg 35.2 (35.5) and FAR-Avg 33.4 (33.0), StreamForest +STC-Cacher BT-Avg 51.5 (51.0).",
        "ViT: time for the ViT to encode 16 frames; Prefill: LLM prefilling time (printed as seconds, "
        "the magnitudes fit milliseconds); hardware not stated.",
    ),
)

STREAMINGBENCH_COLUMNS = ("CS", "OP", "ATP", "PR", "ACP", "SU", "EU", "CT", "TR", "CR", "Overall", "ViT", "Prefill")

TABLE2 = PaperTable(
    key="table2",
    title="Table 2: StreamingBench, Real-Time Visual Understanding (accuracy %, latency)",
    columns=STREAMINGBENCH_COLUMNS,
    rows=tuple(
        _rows("StreamForest", """
            -           | 82.7 83.1 84.3 76.9 75.6 69.1 77.5 54.4 78.2 82.8 77.3 103.7 366.2
            +STC-Cacher | 82.3 81.7 81.6 78.7 75.6 67.9 78.8 62.2 75.1 81.3 76.9 67.7 366.2
        """)
        + _rows("ReKV", """
            -                 | 79.2 77.5 75.6 66.0 62.2 60.3 72.3 43.6 69.7 79.5 69.1 103.7 482.4
            +ToMe             | 67.5 64.6 66.3 63.0 58.4 53.3 65.2 19.7 57.3 76.6 59.4 70.5 257.8
            +VisionZip        | 69.5 66.4 69.3 50.7 52.9 57.2 64.1 33.3 54.8 73.4 60.4 103.7 258.3
            +VidCom2          | 76.0 68.1 71.6 62.0 58.6 52.0 64.0 42.5 60.4 76.6 63.6 103.7 259.1
            +STC-Pruner       | 75.4 66.8 71.2 63.9 57.8 51.2 64.0 45.1 63.2 76.6 63.7 103.7 259.2
            +Cacher & Pruner  | 74.4 71.3 72.9 69.4 58.9 52.4 60.9 44.0 66.9 77.3 65.2 78.3 263.7
        """)
    ),
    notes=(
        "CS clip summarisation, OP object perception, ATP attribute perception, PR prospective reasoning, "
        "ACP action perception, SU spatial understanding, EU event understanding, CT counting, "
        "TR text-rich understanding, CR causal reasoning.",
    ),
)

OFFLINE_COLUMNS = ("EgoSchema", "MLVU-dev", "VideoMME Short", "VideoMME Medium", "VideoMME Long", "VideoMME Overall", "Average")

TABLE3 = PaperTable(
    key="table3",
    title="Table 3: offline benchmarks (accuracy %)",
    columns=OFFLINE_COLUMNS,
    rows=tuple(
        _rows("StreamForest", """
            -           | 60.7 68.9 76.0 58.6 50.6 61.7 63.8
            +STC-Cacher | 59.7 68.1 73.0 57.4 51.8 60.7 62.8
        """)
        + _rows("ReKV", """
            -                | 57.7 68.6 70.4 55.4 47.3 57.7 61.3
            +ToMe            | 55.2 63.1 59.6 52.0 43.4 51.7 56.7
            +VisionZip       | 55.8 63.2 59.6 51.8 43.4 51.6 56.9
            +VidCom2         | 60.6 67.1 68.2 55.7 46.6 56.8 61.5
            +STC-Pruner      | 60.8 67.6 68.7 56.3 46.3 57.1 61.8
            +Cacher & Pruner | 59.0 67.0 67.3 53.9 48.3 56.5 60.8
        """)
    ),
    notes=("Average is the mean of EgoSchema, MLVU-dev and VideoMME Overall.",),
)

ABLATION_EGO = ("EPM", "STU", "REC", "Ego")
ABLATION_AVG = ("EPM", "STU", "REC", "Avg")
_OVO_ABLATION = "OVO-Bench EPM / STU / REC accuracy (%)"

TABLE4 = PaperTable(
    key="table4",
    title=f"Table 4: reused features, ReKV ({_OVO_ABLATION}, EgoSchema)",
    columns=ABLATION_EGO,
    rows=tuple(_rows("ReKV", """
        attn only (R 85%) | 2.7 2.3 5.3 26.2
        MLP only (R 85%)  | 49.8 43.2 25.3 57.1
        attn+MLP (R 75%)  | 54.2 46.6 23.4 59.0
    """)),
)

TABLE5 = PaperTable(
    key="table5",
    title=f"Table 5: pruner anchors ({_OVO_ABLATION}, EgoSchema)",
    columns=ABLATION_EGO,
    rows=tuple(_rows("ReKV", """
        only a_s  | 50.5 47.2 25.8 59.9
        only a_t  | 51.5 47.8 24.1 59.8
        a_t + a_s | 51.2 48.9 25.9 59.9
    """)),
    notes=("The a_t + a_s row equals Table 1's ReKV +STC-Pruner row (EPM 51.2, STU 48.9, REC 25.9).",),
)

TABLE6 = PaperTable(
    key="table6",
    title=f"Table 6: reused features, StreamForest ({_OVO_ABLATION}, average)",
    columns=ABLATION_AVG,
    rows=tuple(_rows("StreamForest", """
        attn (R 85%)     | 30.6 33.9 11.2 25.2
        MLP (R 85%)      | 56.9 43.3 27.5 42.6
        attn+MLP (R 75%) | 57.9 46.1 29.9 44.6
    """)),
)

TABLE7 = PaperTable(
    key="table7",
    title=f"Table 7: feature that selects dynamic tokens ({_OVO_ABLATION}, average)",
    columns=ABLATION_AVG,
    rows=tuple(_rows("StreamForest", """
        hidden feature | 56.9 45.5 28.9 43.8
        value          | 58.3 44.9 29.8 44.3
        key            | 57.9 46.1 29.9 44.6
    """)),
    notes=("The key row equals Table 6's attn+MLP row, so the paper's base model here is StreamForest.",),
)

TABLE8 = PaperTable(
    key="table8",
    title=f"Table 8: cache interval N ({_OVO_ABLATION}, average)",
    columns=ABLATION_AVG,
    rows=tuple(_rows("ReKV", """
        N = 1   | 54.6 51.1 25.5 43.7
        N = 4   | 52.2 42.7 24.9 39.9
        N = 7   | 51.9 44.4 23.8 40.0
        N = 10  | 50.8 46.1 22.9 39.9
        N = inf | 44.1 38.2 18.3 33.5
    """)),
)

TABLE9A = PaperTable(
    key="table9a",
    title=f"Table 9a: reuse ratio R_Cacher ({_OVO_ABLATION}, average)",
    columns=ABLATION_AVG,
    rows=tuple(_rows("ReKV", """
        R = 85% | 54.9 45.5 24.5 41.6
        R = 75% | 52.2 42.7 24.9 39.9
        R = 50% | 50.8 46.6 25.4 40.9
    """)),
)

TABLE9B = PaperTable(
    key="table9b",
    title=f"Table 9b: joint (R_Cacher, R_Pruner) ({_OVO_ABLATION}, average)",
    columns=ABLATION_AVG,
    rows=tuple(_rows("ReKV", """
        (50%, 75%) | 51.5 46.1 25.6 41.1
        (75%, 50%) | 50.8 46.2 26.9 41.3
        (75%, 75%) | 50.8 46.1 24.6 40.5
    """)),
)

TABLE10 = PaperTable(
    key="table10",
    title=f"Table 10: anchor weights in Eq. 9 ({_OVO_ABLATION}, average)",
    columns=ABLATION_AVG,
    rows=tuple(_rows("ReKV", """
        a_t + a_s   | 51.2 48.9 25.9 42.0
        a_t + 2 a_s | 51.1 48.8 26.0 42.0
        2 a_t + a_s | 50.1 47.7 25.9 41.6
    """)),
    notes=("The printed average of 2 a_t + a_s (41.6) is not the mean of its three numbers (41.2).",),
)

PAPER_TABLES: MappingProxyType[str, PaperTable] = MappingProxyType(
    {t.key: t for t in (TABLE1, TABLE2, TABLE3, TABLE4, TABLE5, TABLE6, TABLE7, TABLE8, TABLE9A, TABLE9B, TABLE10)}
)

# Relative latency changes printed in parentheses: (table, row label, column) -> percent.
PRINTED_CHANGES: MappingProxyType[tuple[str, str, str], float] = MappingProxyType({
    ("table1", "Dispider +STC-Cacher", "ViT"): -28.4,
    ("table1", "LiveCC +STC-Cacher", "ViT"): -30.0,
    ("table1", "StreamForest +STC-Cacher", "ViT"): -34.7,
    ("table1", "ReKV +ToMe", "ViT"): -32.0,
    ("table1", "ReKV +ToMe", "Prefill"): -46.6,
    ("table1", "ReKV +VisionZip", "Prefill"): -46.5,
    ("table1", "ReKV +VidCom2", "Prefill"): -46.3,
    ("table1", "ReKV +STC-Pruner", "Prefill"): -46.3,
    ("table1", "ReKV +STC-Cacher & Pruner", "ViT"): -24.5,
    ("table1", "ReKV +STC-Cacher & Pruner", "Prefill"): -45.3,
})  # fmt: skip

# Fig. 1: share (%) of inference time spent in ViT / projector / LLM prefill.
FIG1_STAGES = ("ViT", "projector", "prefill")
FIG1_TIME_SHARES: MappingProxyType[str, dict[str, tuple[float, float, float]]] = MappingProxyType({
    "Qwen2-VL": {"image": (28, 4, 68), "32 frames": (59, 7, 34), "64 frames": (70, 8, 22)},
    "LLaVA-OV": {"image": (26, 6, 68), "32 frames": (56, 11, 33), "64 frames": (66, 12, 22)},
})  # fmt: skip

# Fig. 2: mean cosine similarity of adjacent frames' ViT features in LLaVA-OV, by layer.
FIG2_ADJACENT_SIMILARITY: MappingProxyType[str, dict[int, float]] = MappingProxyType({
    "offline (64 uniform frames)": {5: 0.200, 10: 0.215, 20: 0.600},
    "online (0.5 fps)": {5: 0.704, 10: 0.700, 20: 0.849},
})  # fmt: skip
