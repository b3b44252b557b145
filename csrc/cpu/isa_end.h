// Closes the region opened by isa_<isa>_begin.h.
#pragma GCC pop_options
