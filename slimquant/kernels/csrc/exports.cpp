// sq_signatures() and sq_struct_layouts(): exports.h's lists as text, for kernels/native.py.
#include "exports.h"

#include <cstddef>
#include <string>

namespace {

// "int sq_isa();\nvoid sq_int8_gemm(const int8_t* xq, int m, ...);\n..."
#define SQ_SIGNATURE_TEXT(ret, name, params) #ret " " #name #params ";\n"
const char kSignatures[] = SQ_FUNCTIONS(SQ_SIGNATURE_TEXT);

// "SqLinear 64: int32_t kind 0; int32_t n 4; ...\n": each struct's size, then each field's type, name, offset.
std::string struct_layouts() {
  std::string text;
#define SQ_FIELD_TEXT(type, name) \
  text += std::string(" ") + #type + " " + #name + " " + std::to_string(offsetof(Self, name)) + ";";
#define SQ_STRUCT_TEXT(name, fields)                                        \
  {                                                                         \
    using Self = name;                                                      \
    text += std::string(#name) + " " + std::to_string(sizeof(Self)) + ":"; \
    fields(SQ_FIELD_TEXT) text += "\n";                                     \
  }
  SQ_STRUCTS(SQ_STRUCT_TEXT)
  return text;
}

}  // namespace

extern "C" {

const char* sq_signatures() { return kSignatures; }

const char* sq_struct_layouts() {
  static const std::string text = struct_layouts();
  return text.c_str();
}

}  // extern "C"
