"""The report layer: what a reader sees, drawn from the results files on disk (nextlocmoe.results).

    summaries        sentences computed from a results table (what the notebooks print under each table)
    paper            the paper's claims beside our numbers, with a verdict computed from the table
    figures          the results charts (data, training, supervised, zero-shot, ablations, efficiency); it
                     re-exports the routing charts, so every notebook figure is importable from here
    routing_figures  the routing charts of notebook 06 (expert heatmaps, active experts, entropy, prediction map)
    style            colours, hatches and labels the report owns (one colour per method)
    canvas           Agg figures, input checks, legends, interval error bars, atomic PNG writes

All of it only reads: results are written by the experiments through `nextlocmoe.results.write_results`.
None of it imports the experiments, the training stack or torch (tests/test_report_style.py checks this in a
fresh interpreter), so drawing a figure from committed results needs pandas, matplotlib and seaborn only.
"""
