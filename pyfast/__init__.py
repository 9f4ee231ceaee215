"""pyfast"""
