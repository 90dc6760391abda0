"""Hot-path kernels. Each module holds a kernel, its plain-torch reference and the dispatch."""
