"""The shard's engine: batch state (counters per request), flattened step inputs, one step of
forward + sample + stop + detokenize, and the engine that owns cached batches and the KV cache."""
