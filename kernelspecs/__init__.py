"""Each sandbox language's kernelspec: its kernel.json template and logos (`jupyter scalebox install` writes from
these). Shipped in the package as scalebox_kernel.kernelspecs."""
