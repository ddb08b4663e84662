"""The report layer: what a reader sees, drawn from the results files on disk (nextlocmoe.results).

    summaries  sentences computed from a results table (what the notebooks print under each table)
    figures    every figure of the notebooks (matplotlib Figures, saved as PNG under figures/)

Both only read: results are written by the experiments through `nextlocmoe.results.write_results`.
"""
