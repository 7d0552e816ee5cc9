"""cluster/cli"""
