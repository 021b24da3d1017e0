"""The paper's tables regenerated from logged runs, with the paper's numbers beside them.

Owns: ``tables`` (rows, cells, mean ± std over seeds, Welch's test against the baseline),
``sources`` (where runs are read from: the run store or the W&B API), ``render`` (Markdown,
LaTeX, CSV) and ``plots`` (training curves, PQ against k).
May import: ``maps.registry`` (the rows and the paper's numbers) and ``maps.launch.runstore``
(the records it reads); never the commands, the demo or the sweeps.
"""
from maps.report.render import FORMATS, render, write_tables
from maps.report.sources import RunSource, RunStoreSource, WandbSource
from maps.report.tables import (
    ALPHA,
    BASELINES,
    TESTED_METRICS,
    Cell,
    Comparison,
    Report,
    Row,
    Table,
    as_source,
    build_table,
    build_tables,
    summarize,
    table_numbers,
    welch_test,
)

__all__ = [
    "ALPHA", "BASELINES", "TESTED_METRICS", "Cell", "Comparison", "Report", "Row", "Table",
    "as_source", "build_table", "build_tables", "summarize", "table_numbers", "welch_test",
    "FORMATS", "render", "write_tables", "RunSource", "RunStoreSource", "WandbSource",
]
