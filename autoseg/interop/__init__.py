"""Models of other frameworks turned into ordinary autoseg work folders (``autoseg import-nnunet``)."""
