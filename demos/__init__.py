"""The offline demos' own code: tiny models built on first use (demos.models); knows nothing of search."""
