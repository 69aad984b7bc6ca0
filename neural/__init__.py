"""Fusion models trained out-of-fold on the cached features (store -> RUN_DIR predictions).

    options.py   NeuralOptions (one dataclass, recorded with every output), model names
    folds.py     stratified folds drawn once per run (rare classes dealt round-robin; see its docstring)
    data.py      StoreBatches: batches of store rows read lazily; which datasets each model needs
    models.py    single, dual, cross, vlad, mlp: nn.Modules with a fine and an auxiliary coarse head
    vlad.py      the vlad model's trainable NeXtVLAD/NetVLAD, initialised from CACHE_DIR/codebook.h5
    train.py     one fold: multi-task loss, label smoothing, class-balanced weights, EMA, FGM, R-Drop
    outputs.py   RUN_DIR/<model>/predictions.h5, written crash-safely fold by fold
    pipeline.py  train_neural(cache_dir, out_dir, models, options): folds, every model, resume
    predict.py   predict_store(run_dir, store_path, models=None): fold-averaged probabilities
    metrics.py   the challenge metric
"""
