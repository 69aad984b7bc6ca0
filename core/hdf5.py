"""HDF5 datasets the stages write row by row: chunked by row and allocated in full at creation, so a
later write only touches raw chunk bytes, never the file's metadata (a crash mid-write leaves it readable).

    create_dataset(h5, "oof_proba", (N, C), "f4")
"""
import h5py


def _early_dcpl():
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def create_dataset(h5, name, shape, dtype):
    """A dataset chunked by row and allocated in full now, so later writes never touch metadata."""
    chunks = (1,) + tuple(shape[1:]) if len(shape) > 1 else (min(max(shape[0], 1), 4096),)
    # fill_time never: allocation must not write N rows of zeros; every row is written whole.
    return h5.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks,
                             dcpl=_early_dcpl(), fill_time="never")
