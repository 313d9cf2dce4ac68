"""tenancy: keys, limits, fair shares, accounting"""
