"""Optional Triton kernels. Import the submodules lazily: triton is not needed on CPU."""
