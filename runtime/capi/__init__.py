"""libdeedsr: the runtime behind a stable C ABI (deedsr.h), for services in C, C++, Go or Rust.

    deedsr capi --out DIR      # DIR/libdeedsr.so, DIR/deedsr.h, DIR/deedsr.pc

build.py compiles the library with cffi's embedding mode; libdeedsr.c is its C half and
bindings.py the Python half that the embedded interpreter runs. Importing this package is
cheap: nothing here imports cffi or onnxruntime until a build or a call needs it.
"""
