"""Storage tiers below the GPU: the pinned CPU slab, the O_DIRECT disk slab, and the store over both."""
