"""Dataset preparation: captioned image folders -> a clean, deduplicated training set with a manifest."""
