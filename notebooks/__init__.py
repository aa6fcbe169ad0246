"""The example notebooks; quickstart.ipynb is what `jupyter scalebox demo` runs. Shipped in the package as
scalebox_kernel.notebooks."""
