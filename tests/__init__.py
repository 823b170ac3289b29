"""
Tests for L{ollamamq}.
"""
