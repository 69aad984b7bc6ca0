"""What every stage shares, below them all: written records and owned files, the feature store's
layout, HDF5 allocation, the world of processes, the device and precision.

    core/records.py    atomic writes, JSON records read with a clear error, options compared key by key
    core/owned.py      which files a command may delete or replace
    core/schema.py     the feature store's layout: the contract between extract and its readers
    core/hdf5.py       datasets chunked by row and allocated in full at creation
    core/world.py      the ranks of a torchrun (one process is a world of size one)
    core/device.py     the torch device and precision a stage runs in
    core/components.py components from installed packages (entry points) and the origin each file records

core imports no stage; the stages (features -> neural -> stacking -> inference, demo and run.py on top)
import it (tests/test_import_layers.py holds both).
"""
