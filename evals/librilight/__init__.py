"""`ttt eval librilight`: long-context perplexity on LibriLight-style audiobooks with reset policies (SPEC §6)."""
