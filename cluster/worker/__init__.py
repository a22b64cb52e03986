"""What every framework's worker loop shares, none of it framework code and none of it Ray."""
