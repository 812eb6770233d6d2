"""The core: modules, variables, filters, the graph view, state and rngs."""
