import os

# No GPU on the machines this suite runs on: Triton kernels run in the interpreter. It must be set
# before any Triton kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
