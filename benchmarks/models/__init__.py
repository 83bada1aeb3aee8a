"""Model-level benchmarks: ``methods`` (the models and each PEFT method built by fastpeft and by its peer) and
``train_step`` (one training step timed interleaved: ``python -m benchmarks --op train_step``)."""
