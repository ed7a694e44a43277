"""Builds the optional native BPE merge loop; all other metadata lives in pyproject.toml.

`optional=True`: without a C++ compiler the install still succeeds and tinylm uses the
pure-Python merge loop (same results, slower training).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tinylm.tokenizer._bpe_native",
            ["tinylm/tokenizer/_bpe_native.cpp"],
            extra_compile_args=["-O3", "-std=c++17"],
            language="c++",
            optional=True,
        )
    ]
)
