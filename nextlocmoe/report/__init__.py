"""The report layer: what a reader sees, drawn from the results files on disk.

    tables     the one results writer (<name>.csv + <name>.md + <name>.json provenance) and its reader;
               Markdown rendering of tidy tables
    summaries  sentences computed from a results table (what the notebooks print under each table)
    figures    every figure of the notebooks (matplotlib Figures, saved as PNG under figures/)

Modules are imported by name (`from nextlocmoe.report.figures import plot_supervised`): `tables` is used by
the layers that write results, `summaries` and `figures` only read them.
"""
