"""Evaluating generated images the way the field reports them: FID, IS, KID and precision/recall
over Inception-v3 features (`nextdetail eval-samples`), for folders, ADM .npz batches and
decomposition stores. See docs/evaluation.md."""
