"""Fusion models trained out-of-fold on the cached features (store -> RUN_DIR predictions).

    options.py     NeuralOptions (one dataclass, recorded with every output)
    models/        the registry (name -> class, store inputs, what it needs to initialise), shared blocks,
                   one module per model: single, dual, cross, vlad, mlp, linear, names
    spec.py        ModelSpec: what rebuilds a fold model before its tensors are loaded (JSON round trip)
    checkpoint.py  fold<k>.safetensors + fold<k>.json: saved and loaded without unpickling anything
    folds.py       stratified folds drawn once per run (rare classes dealt round-robin; see its docstring)
    data.py        StoreBatches: batches of store rows read lazily
    train.py       one fold: multi-task loss, label smoothing, class-balanced weights, EMA, FGM, R-Drop
    outputs.py     RUN_DIR/run.json (read_run, write_run) and <model>/predictions.h5, written crash-safely
    pipeline.py    train_neural(cache_dir, out_dir, models, options): folds, every model, resume
    distributed.py under torchrun: which (model, fold) fits each rank runs; per-fold rows merged by one rank
    predict.py     predict_store(run_dir, store_path, models=None, reader=None): fold-averaged probabilities
    metrics.py     the challenge metric
"""
