"""AlexNet, the Python side.

    python alexnet.py prepare SOURCE [PATH] --out DIR    # images -> dataset folder
    python alexnet.py demo                               # the one-command demo

Sections, in reading order:
  1. dataset files: the binary formats, read_shard, read_stats
  2. data preparation: synthetic, CIFAR-10, ImageNet
  3. NumPy reference of every layer (forward and backward), named like the CUDA kernels
  4. NumPy reference of the whole two-tower model
  5. the shared library: cffi bindings to train_alexnet.cu's C API
  6. command line
"""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))


class AlexNetError(Exception):
    """A user-facing error: the command line prints it as one line and exits 1."""


COMMANDS = {}  # name -> (add_arguments(parser), run(args)); each section registers its commands


# -----------------------------------------------------------------------------
# 1. Dataset files


# -----------------------------------------------------------------------------
# 2. Data preparation


# -----------------------------------------------------------------------------
# 3. NumPy reference: layers

# --- 3a. convolution and fully connected

# --- 3b. the other layers


# -----------------------------------------------------------------------------
# 4. NumPy reference: the whole model


# -----------------------------------------------------------------------------
# 5. The shared library (cffi)
#
# The library is libalexnet_cpu.so (the CPU build) unless ALEXNET_LIB names another,
# e.g. libalexnet.so for the GPU build. Each binding section appends its C
# declarations to _CDEFS; library() loads the library once with all of them.

_CDEFS = ["const char* alexnet_last_error(void);"]
_library = None


def library():
    """The loaded shared library: (ffi, lib)."""
    global _library
    if _library is None:
        import cffi
        path = os.environ.get("ALEXNET_LIB") or os.path.join(ROOT, "libalexnet_cpu.so")
        if not os.path.exists(path):
            raise AlexNetError(f"{path} not found: run `make` first")
        ffi = cffi.FFI()
        ffi.cdef("\n".join(_CDEFS))
        _library = (ffi, ffi.dlopen(os.path.abspath(path)))
    return _library


def _check(status):
    """Raise AlexNetError with the library's message when a C API call failed."""
    if status != 0:
        ffi, lib = library()
        raise AlexNetError(ffi.string(lib.alexnet_last_error()).decode())


def _ptr(array, ctype="float"):
    """A C pointer to a C-contiguous NumPy array (None stays NULL)."""
    ffi, _ = library()
    if array is None:
        return ffi.NULL
    assert array.flags.c_contiguous
    return ffi.cast(ctype + " *", ffi.from_buffer(array))

# --- 5a. bindings: convolution and fully connected

# --- 5b. bindings: the other layers


# -----------------------------------------------------------------------------
# 6. Command line

def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="alexnet.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args) or 0
    except AlexNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
