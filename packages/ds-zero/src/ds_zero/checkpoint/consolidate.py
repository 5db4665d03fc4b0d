def consolidate_checkpoint(ckpt_dir, tag=None, dtype=None):
    raise NotImplementedError("not built yet")
