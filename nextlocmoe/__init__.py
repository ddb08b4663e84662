"""NextLocMoE companion: the model of arXiv 2505.24597 with its data, training and experiments.

Flow of the package, one direction only:
raw records (`data.sources`) -> windows (`data.windows`) -> model (`model`) -> training (`train`)
-> experiments -> results files -> tables and figures (notebooks).
"""

__version__ = "0.1.0"
