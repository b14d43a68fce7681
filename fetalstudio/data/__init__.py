"""Reading the label tables of ../shared/data and any dataset laid out like them."""
