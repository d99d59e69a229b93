"""unionfs: a union filesystem in userspace."""
