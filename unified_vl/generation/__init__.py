"""Generation helpers: constrained decoding (answer tries, location-only) and candidate scoring."""
