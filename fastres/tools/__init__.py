"""Tools around the inference path: the benchmark harness (`fastres bench`), the ahead-of-time compile
report and the performance estimate (`fastres compile-report`). The runtime never imports them."""
