"""The offline miniature world: scene generator, tiny base CLIP, benchmarks, probes, demo and ablations."""
