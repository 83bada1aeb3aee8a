"""Stand-alone measurements beside the suite, each run as ``python -m benchmarks.standalone.<name>``
(``--help`` lists its options): ``overhead`` (fixed per-call cost of the LoRA/QLoRA layers),
``prefix_tuning_step`` (a prefix-tuning training step), ``nf4_cpu_speed`` and ``nf4_cpu_bf16_speed``
(the native NF4 CPU kernels' row thresholds)."""
