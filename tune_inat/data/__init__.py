"""Image-folder data: scan and validate, split, decode once into a cache, serve device batches.

Submodules, in the order data flows through them:
- `folders`  finds the layout, lists images by content, validates classes, splits stratified;
- `decode`   turns one image file (any mode, EXIF-rotated) into a square RGB uint8 array;
- `cache`    decodes a file list once into a memory-mapped `.npy`, keyed by the list;
- `dataset`  ties them together: `prepare_train_val` (the search's view, no test split) and
             `prepare_test`;
- `batches`  serves augmented, normalised batches on the training device (imports torch);
- `demo`, `download`: the `python -m tune_inat.data` commands.

This `__init__` stays empty so the torch-free parts import fast.
"""
