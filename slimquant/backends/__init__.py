"""Which kernels run a model, picked once when it loads (select.py): cpu-native, cuda-triton or torch-reference.
Each is a Backend (base.py) with its ops (torch_ops.py, native_ops.py, triton_ops.py) and its step."""
