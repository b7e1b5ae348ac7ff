// The talk page (filled in by the next commit).
