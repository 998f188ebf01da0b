"""flexmf-assets: FlexMF matrix-factorization recommenders as Dagster assets.

The ML core (``flexmf``, ``datasets``, ``evaluation``) imports no Dagster; the Dagster layer
lives in ``flexmf_assets.defs``.
"""

__version__ = "0.1.0"
