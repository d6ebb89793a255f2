"""The ascend (ModelSlim) format, shared by the quantizer and the engine (docs/FORMAT.md): schemes, the int8 math,
the description and its shards, the architecture registry. Imports nothing else of slimquant."""
