"""The offline build pipeline: from a corpus to a trained memory bank (`hmem build`)."""
