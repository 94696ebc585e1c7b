"""custom_ops"""
