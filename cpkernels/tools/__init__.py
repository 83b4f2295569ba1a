"""Tools on top of the library, which the library never imports: the per-layer profiler, the shared benchmark
layer list, the ahead-of-time compile report, the trained networks (the digits CNN trained on the spot, HED's
VGG-16 read from its wheel) and the demos."""
