// qcompile-runner: runs a Relax library exported by qcompile on a device without Python.
//
//   qcompile-runner MODEL.so OUT_DIR INPUT.npy [INPUT.npy ...] [--repeat N] [--function NAME]
//
// Loads MODEL.so, creates the Relax virtual machine on the CPU, calls "main" with the inputs (in the
// model's input order), writes output i to OUT_DIR/output_i.npy, and prints one line
// "qcompile-runner: runs=N median_ms=M" when --repeat is given. With --function NAME it calls the
// library's function NAME directly instead (a TIR kernel in destination-passing style: outputs and
// scratch are among the arguments) and writes every argument back as output_i.npy. Only the tvm-ffi headers and the
// libtvm_ffi / libtvm_runtime libraries of the device are needed. Exit codes: 0 done, 1 bad input,
// 2 the library failed.

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct HostAlloc {
  void AllocData(DLTensor* tensor) {
    tensor->data = std::aligned_alloc(64, ((ffi::GetDataSize(*tensor) + 63) / 64) * 64 + 64);
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

struct DType {
  const char* descr;
  DLDataType dl;
};

// The .npy element types the runner reads and writes (little-endian only, as every target here is).
const DType kTypes[] = {
    {"<f4", {kDLFloat, 32, 1}}, {"<f8", {kDLFloat, 64, 1}}, {"<i8", {kDLInt, 64, 1}},
    {"<i4", {kDLInt, 32, 1}},   {"|i1", {kDLInt, 8, 1}},    {"|u1", {kDLUInt, 8, 1}},
    {"|b1", {kDLBool, 8, 1}},   {"<i2", {kDLInt, 16, 1}},   {"<u2", {kDLUInt, 16, 1}},
};

DLDataType ParseDescr(const std::string& descr) {
  for (const DType& type : kTypes) {
    if (descr == type.descr) return type.dl;
  }
  throw std::runtime_error("unsupported .npy dtype " + descr);
}

const char* Descr(DLDataType dtype) {
  for (const DType& type : kTypes) {
    if (type.dl.code == dtype.code && type.dl.bits == dtype.bits) return type.descr;
  }
  throw std::runtime_error("output dtype has no .npy form");
}

std::string HeaderField(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error("npy header has no " + key);
  at = header.find(':', at);
  size_t start = header.find_first_not_of(" ", at + 1);
  if (header[start] == '\'') {
    return header.substr(start + 1, header.find('\'', start + 1) - start - 1);
  }
  if (header[start] == '(') return header.substr(start + 1, header.find(')', start) - start - 1);
  return header.substr(start, header.find_first_of(",}", start) - start);
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open " + path);
  char magic[8];
  file.read(magic, 8);
  if (!file || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + " is not .npy");
  uint32_t header_length = 0;
  if (magic[6] == 1) {
    unsigned char bytes[2];
    file.read(reinterpret_cast<char*>(bytes), 2);
    header_length = bytes[0] | (bytes[1] << 8);
  } else {
    unsigned char bytes[4];
    file.read(reinterpret_cast<char*>(bytes), 4);
    header_length = bytes[0] | (bytes[1] << 8) | (bytes[2] << 16) | (static_cast<uint32_t>(bytes[3]) << 24);
  }
  std::string header(header_length, '\0');
  file.read(header.data(), header_length);
  if (HeaderField(header, "fortran_order") != "False") throw std::runtime_error(path + " is Fortran-ordered");
  DLDataType dtype = ParseDescr(HeaderField(header, "descr"));
  std::vector<int64_t> shape;
  std::stringstream dims(HeaderField(header, "shape"));
  std::string dim;
  while (std::getline(dims, dim, ',')) {
    if (dim.find_first_not_of(" ") != std::string::npos) shape.push_back(std::stoll(dim));
  }
  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(HostAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype,
                                                DLDevice{kDLCPU, 0});
  size_t bytes = ffi::GetDataSize(*tensor.GetDLTensorPtr());
  file.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(bytes));
  if (static_cast<size_t>(file.gcount()) != bytes) throw std::runtime_error(path + " is truncated");
  return tensor;
}

void WriteNpy(const std::string& path, const ffi::Tensor& tensor) {
  const DLTensor* view = tensor.GetDLTensorPtr();
  std::string shape;
  for (int i = 0; i < view->ndim; ++i) shape += std::to_string(view->shape[i]) + ",";
  if (view->ndim > 1) shape.pop_back();
  std::string header = std::string("{'descr': '") + Descr(view->dtype) + "', 'fortran_order': False, 'shape': (" +
                       shape + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream file(path, std::ios::binary);
  file.write("\x93NUMPY\x01\x00", 8);
  const unsigned char length[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                   static_cast<unsigned char>(header.size() >> 8)};
  file.write(reinterpret_cast<const char*>(length), 2);
  file.write(header.data(), static_cast<std::streamsize>(header.size()));
  file.write(static_cast<const char*>(view->data) + view->byte_offset,
             static_cast<std::streamsize>(ffi::GetDataSize(*view)));
  if (!file) throw std::runtime_error("cannot write " + path);
}

std::vector<ffi::Tensor> Outputs(const ffi::Any& result) {
  if (auto tensor = result.as<ffi::Tensor>()) return {*tensor};
  std::vector<ffi::Tensor> outputs;
  if (auto items = result.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *items) {
      auto nested = Outputs(item);
      outputs.insert(outputs.end(), nested.begin(), nested.end());
    }
    return outputs;
  }
  throw std::runtime_error("main returned neither a tensor nor a tuple of tensors");
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> inputs;
  int repeat = 0;
  std::string function;
  for (int i = 3; i < argc; ++i) {
    if (std::strcmp(argv[i], "--repeat") == 0 && i + 1 < argc) {
      repeat = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--function") == 0 && i + 1 < argc) {
      function = argv[++i];
    } else {
      inputs.emplace_back(argv[i]);
    }
  }
  if (argc < 3) {
    std::cerr << "usage: qcompile-runner MODEL.so OUT_DIR INPUT.npy [INPUT.npy ...] [--repeat N] [--function NAME]\n";
    return 1;
  }
  std::vector<ffi::Tensor> arguments;
  try {
    for (const std::string& path : inputs) arguments.push_back(ReadNpy(path));
  } catch (const std::exception& error) {
    std::cerr << "qcompile-runner: " << error.what() << "\n";
    return 1;
  }
  try {
    ffi::Module library = ffi::Module::LoadFromFile(argv[1]);
    std::vector<ffi::AnyView> packed(arguments.begin(), arguments.end());
    ffi::Any result;
    // The Relax VM runs "main"; with --function, the library's own function runs directly.
    ffi::Module vm =
        function.empty() ? library->GetFunction("vm_load_executable").value()().cast<ffi::Module>() : library;
    if (function.empty()) {
      // (device type, device id, allocator) for the CPU; 2 is the pooled allocator, as Python's default.
      vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    }
    ffi::Function entry = vm->GetFunction(function.empty() ? std::string("main") : function).value();
    auto call = [&] { entry.CallPacked(packed.data(), static_cast<int32_t>(packed.size()), &result); };
    call();
    // The Relax main returns its outputs; a TIR kernel writes into its arguments.
    std::vector<ffi::Tensor> outputs = function.empty() ? Outputs(result) : arguments;
    for (size_t i = 0; i < outputs.size(); ++i) {
      WriteNpy(std::string(argv[2]) + "/output_" + std::to_string(i) + ".npy", outputs[i]);
    }
    if (repeat > 0) {
      std::vector<double> times;
      for (int run = 0; run < repeat; ++run) {
        auto start = std::chrono::steady_clock::now();
        call();
        times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
      }
      std::sort(times.begin(), times.end());
      std::printf("qcompile-runner: runs=%d median_ms=%.4f\n", repeat, times[times.size() / 2]);
    }
  } catch (const std::exception& error) {
    std::cerr << "qcompile-runner: " << error.what() << "\n";
    return 2;
  }
  return 0;
}
