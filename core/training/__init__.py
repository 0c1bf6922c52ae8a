"""The training engine that `fakecifar train` (and distillation after it) runs on.

    loop.py            Engine: epochs, steps, schedule, EMA, precision, stop/NaN checks, DDP
                       reductions, history, resume state; calls the task, the source, callbacks
    task.py            Task (forward, loss, optimizers, metrics, own state), StepContext, StepOutput
    classification.py  ClassificationTask: hard labels or soft targets, validation
    sources.py         BatchSource; ShardBatches (BatchLoader + augmentation), GeneratedBatches
    callbacks.py       Callback; SaveBest, EarlyStopping, Checkpoint, JsonlLog, EpochSnapshots, Hooks
    config.py          TrainConfig, RUN_SETTINGS, RECIPES, make_config: every knob, defined once
    settings.py        the settings registry the CLI derives its options from
    runtime.py         processes (DDP), device, autocast dtype, reductions across processes
    stopping.py        StopFlag (SIGINT/SIGTERM), TrainingInterrupted, TrainingDiverged
    schedules.py       lr_factor: cosine, onecycle, multistep, constant (+ warm-up)
    ema.py             EMA of the weights

Import the submodules (this file imports nothing: the CLI reads config.py without torch).
"""
