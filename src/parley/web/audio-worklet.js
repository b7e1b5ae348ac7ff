// The talk page audio worklet (filled in by the next commit).
