"""From engine statistics to claims: classes, participation, statistics, verdicts, release results, activation
agreement."""
