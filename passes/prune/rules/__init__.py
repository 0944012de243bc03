"""Channel rules of the dependency analysis, one module per op kind (see ``passes.prune.analysis``)."""
